"""Peer replication in the daemon: the job that sends this node's newest step to its partners,
and ``Peering``, which runs the peer server (``daemon.peer_server``), keeps the replicas of
others within their limits, and reports what each partner holds."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from daemon.jobs import pacer
from daemon.metrics import Metrics
from daemon.mtc import MtcProtocol
from daemon.peer_server import MAX_TRANSFERS_IN, PeerContext, PeerServer
from daemon.settings import Settings
from daemon.state import DaemonState, with_item, without
from daemon.workers import Job, Lane, Outcome, Progress
from tiered import (
    LocalTier,
    TieredError,
)
from tiered.sidecar import (
    PEER_NONCES,
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
    replication_pace,
)

log = logging.getLogger("daemon")


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


class Peering:
    """This node's peers: the peer server's thread, the replication jobs on the ``peer`` lane,
    and the reducer of their outcomes. With peering off (``TieredConfig.peering``), ``start``
    starts nothing and every answer is "none"."""

    def __init__(
        self,
        settings: Settings,
        local: LocalTier,
        *,
        lane: Lane,
        metrics: Metrics,
        mtc: MtcProtocol | None,
        room: Callable[[], int],
    ) -> None:
        self._settings = settings
        self._local = local
        self._lane = lane
        self._metrics = metrics
        self._mtc = mtc
        self._room = room
        """The bytes a replica may take here (``daemon.disk``)."""
        self.store = PeerStore(local.root)
        self.server: PeerServer | None = None
        self._clients_for: tuple[tuple[int, ...], list[PeerClient]] | None = None

    @property
    def running(self) -> bool:
        """The peer server serves (peering is configured and ``start`` ran)."""
        return self.server is not None

    def ranks(self) -> list[int]:
        """The partners this node sends its steps to."""
        cfg, topology = self._settings.cfg, self._settings.topology
        explicit = cfg.tiered.peers
        if explicit is None and self._mtc is not None and self._mtc.active is not None:
            explicit = list(self._mtc.active.peer_ranks) or None
        return partners(topology.rank, topology.nodes, explicit)

    def start(self) -> None:
        """Start the peer server (with peer replication configured)."""
        settings = self._settings
        cfg, topology = settings.cfg, settings.topology
        if not cfg.peering:
            return
        auth = PeerAuth(
            load_secret(cfg),
            topology.rank,
            job=job_identity(cfg.durable_url),
            record=NonceRecord(self._local.tiered_dir / PEER_NONCES),
        )
        self.store.clean_partial()
        ctx = PeerContext(
            store=self.store,
            auth=auth,
            rank=lambda: settings.topology.rank,
            nodes=lambda: settings.topology.nodes,
            keep=cfg.tiered.peer_keep,
            free_bytes=self._room,
            slots=threading.Semaphore(MAX_TRANSFERS_IN),
        )
        address = listen_address(cfg, topology.rank, topology.nodes)
        self.server = PeerServer(address, ctx, timeout=cfg.tiered.peer_timeout_seconds)
        self.server.start()
        log.info(
            "Peer server on %s; this node's steps go to nodes %s",
            self.server.address,
            self.ranks() or "none yet (one node)",
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def shed(self) -> None:
        """Under disk pressure: keep only each partner's newest copy."""
        if self.server is None:
            return
        for owner in {r.owner for r in self.store.replicas()}:
            for step in self.store.prune(owner, keep=1):
                log.warning(
                    "Local disk pressure: dropped node %d's step %d from the peer store",
                    owner,
                    step,
                )

    def held_bytes(self) -> int | None:
        """The bytes of others' steps kept here (None: no peer server)."""
        return self.store.used_bytes() if self.server is not None else None

    def _clients(self) -> list[PeerClient]:
        ranks = tuple(self.ranks())
        if self._clients_for is None or self._clients_for[0] != ranks:
            cfg, topology = self._settings.cfg, self._settings.topology
            clients = clients_for(cfg, topology.rank, topology.nodes, list(ranks))
            self._clients_for = (ranks, clients)
        return self._clients_for[1]

    def submit(self, state: DaemonState) -> None:
        """Send the newest committed local step to the partners that lack it (one job at a
        time, on its own lane: it never holds up training or promotion)."""
        setup = self._settings.now
        if self.server is None or not setup.topology.multi or self._lane.busy:
            return
        nodes = setup.topology.nodes
        steps = [s for s in self._local.scan(with_size=True) if s.committed and s.fits(nodes)]
        if not steps:
            return
        newest = steps[-1]
        now = time.monotonic()
        due = [
            c
            for c in self._clients()
            if state.peer_sent.get(c.rank) != (newest.step, newest.identity)
            and now >= state.peer_retry_at.get(c.rank, 0.0)
        ]
        if due:
            pace = replication_pace(newest.size, newest.reason, local=steps, rules=setup.rules)
            limiter = pacer(setup.cfg.tiered.peer_bandwidth_mb_per_s, pace.bytes_per_s)
            job = replicate(self._local, setup.topology.rank, newest.step, due, limiter=limiter)
            self._lane.submit(job)

    def on_replicate(self, state: DaemonState, outcome: Outcome) -> DaemonState:
        step = outcome.job.step or 0
        if outcome.error is not None:
            err = outcome.error
            if not isinstance(err, TieredError | OSError):
                raise err
            if not self._local.step_dir(step).exists():
                return state  # pruned meanwhile; the next newest goes next
            outcome_map: dict[int, Sent | BaseException] = dict.fromkeys(outcome.job.data, err)
            identity = None
        else:
            identity, outcome_map = outcome.value
        tiered = self._settings.cfg.tiered
        for rank, result in outcome_map.items():
            if isinstance(result, Sent):
                if result.how == "sent":
                    self._metrics.peer_bytes_sent.inc(result.bytes)
                    log.info(
                        "Replicated step %d to peer node %d (%d bytes in %.1f s)",
                        step,
                        rank,
                        result.bytes,
                        result.seconds,
                    )
                self._metrics.peer_step.labels(peer=str(rank)).set(step)
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
                tiered.retry_max_seconds, tiered.retry_initial_seconds * 2 ** (failures - 1)
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
            self._metrics.errors.labels(kind="peer").inc()
            state = replace(
                state,
                peer_errors=with_item(state.peer_errors, rank, message),
                peer_failures=with_item(state.peer_failures, rank, failures),
                peer_retry_at=with_item(state.peer_retry_at, rank, time.monotonic() + delay),
            )
        return state

    def replicated_step(self, state: DaemonState) -> int | None:
        """The newest local step every partner is known to hold (None: not all hold one)."""
        if self.server is None or not self._settings.topology.multi:
            return None
        sent = state.peer_sent
        return held_by_every_peer(sent[r][0] if r in sent else None for r in self.ranks())

    def view(self, state: DaemonState) -> dict[str, Any] | None:
        """The status's ``peers`` block: what this node sent, and what it keeps for others."""
        if self.server is None:
            return None
        held = self.store.replicas()
        return {
            "address": self.server.address,
            "sends_to": {
                str(rank): {
                    "step": state.peer_sent[rank][0] if rank in state.peer_sent else None,
                    "error": state.peer_errors.get(rank),
                }
                for rank in self.ranks()
            },
            "holds": [
                {"node": r.owner, "step": r.step, "epoch": r.epoch, "bytes": r.bytes} for r in held
            ],
            "holds_bytes": sum(r.bytes for r in held),
        }

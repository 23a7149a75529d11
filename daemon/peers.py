"""Peer replication in the daemon: the job that sends this node's newest step to its partners,
and the part of the daemon that runs the peer server (``daemon.peer_server``), keeps the
replicas of others within their limits, and reports what each partner holds."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from daemon.base import DaemonBase
from daemon.jobs import pacer
from daemon.peer_server import MAX_TRANSFERS_IN, PeerContext, PeerServer
from daemon.state import with_item, without
from daemon.workers import Job, Outcome, Progress
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

"""A node that lost its disk gets its own steps back from its partners."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass

from tiered.config import TieredConfig
from tiered.errors import (
    ChecksumMismatch,
    LayoutError,
    StorageError,
)
from tiered.layout import COMMIT_MARKER, step_name, tmp_name
from tiered.logs import fields
from tiered.peerauth import (
    PeerAuth,
    job_identity,
)
from tiered.peering.client import Held, PeerClient
from tiered.peering.partners import load_secret, partners, peer_address
from tiered.storage import LocalTier
from tiered.storage.transfer import RateLimiter

log = logging.getLogger("tiered.peering")

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

"""Who sends to whom, at which address, with which secret."""

from __future__ import annotations

import logging

from tiered.config import TieredConfig
from tiered.errors import (
    ConfigError,
)

log = logging.getLogger("tiered.peering")

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

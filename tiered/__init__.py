"""tiered: two-tier checkpointing for JAX training.

The public surface: what a training script, a notebook or an operator's tool imports. The
sidecar's plumbing is in ``tiered.sidecar``. ``CheckpointManager`` imports jax and orbax, so it
is loaded only when first used; everything else here is light enough for the sidecar daemon.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tiered.config import TieredConfig, config_from_mapping
from tiered.config_files import load_config
from tiered.errors import (
    AgreementTimeout,
    AlreadyRunning,
    ChecksumMismatch,
    CommitError,
    ConfigError,
    LayoutError,
    NotFound,
    PeerRefused,
    ReplicatorConfigError,
    StepExists,
    StepUnreadable,
    StorageError,
    TieredError,
)
from tiered.manifest import Manifest
from tiered.report import TierStatus, collect_status
from tiered.storage import DurableTier, LocalTier
from tiered.tiers import fetch_step, promote_step

if TYPE_CHECKING:
    from tiered.manager import CheckpointManager, Restored

__version__ = "0.2.0"

__all__ = [
    "AgreementTimeout",
    "AlreadyRunning",
    "CheckpointManager",
    "ChecksumMismatch",
    "CommitError",
    "ConfigError",
    "DurableTier",
    "LayoutError",
    "LocalTier",
    "Manifest",
    "NotFound",
    "PeerRefused",
    "ReplicatorConfigError",
    "Restored",
    "StepExists",
    "StepUnreadable",
    "StorageError",
    "TierStatus",
    "TieredConfig",
    "TieredError",
    "config_from_mapping",
    "fetch_step",
    "load_config",
    "promote_step",
    "status",
]


def status(config: TieredConfig | str) -> TierStatus:
    """The tier status, as ``tiered status --json`` reports it."""
    cfg = config if isinstance(config, TieredConfig) else load_config(config)
    return collect_status(cfg)


def __getattr__(name: str) -> Any:
    if name in ("CheckpointManager", "Restored"):
        from tiered import manager

        return getattr(manager, name)
    raise AttributeError(f"module 'tiered' has no attribute {name!r}")

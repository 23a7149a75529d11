"""tiered: two-tier checkpointing for JAX training.

The public surface. ``CheckpointManager`` imports jax and orbax, so it is loaded only when first
used; everything else here is light enough for the sidecar daemon.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tiered.config import TieredConfig, config_from_mapping, load_config
from tiered.errors import (
    ChecksumMismatch,
    CommitError,
    ConfigError,
    LayoutError,
    StorageError,
    TieredError,
)
from tiered.layout import StepRef, parse_step
from tiered.manifest import Manifest, build_manifest
from tiered.ops import (
    apply_deletes,
    commit_parts,
    fetch_step,
    open_tiers,
    promote_step,
    snapshot,
    stage_step,
)
from tiered.policy import Plan, RestoreOption, Rules, Snapshot, plan, restore_options, rules_for
from tiered.status import TierStatus, build_status, collect_status, render_table
from tiered.storage import DurableTier, LocalTier, TransferResult
from tiered.types import DurableStep, LocalStep, Topology

if TYPE_CHECKING:
    from tiered.manager import CheckpointManager, Restored

__version__ = "0.1.0"

__all__ = [
    "CheckpointManager",
    "ChecksumMismatch",
    "CommitError",
    "ConfigError",
    "DurableStep",
    "DurableTier",
    "LayoutError",
    "LocalStep",
    "LocalTier",
    "Manifest",
    "Plan",
    "RestoreOption",
    "Restored",
    "Rules",
    "Snapshot",
    "StepRef",
    "StorageError",
    "TierStatus",
    "TieredConfig",
    "TieredError",
    "Topology",
    "TransferResult",
    "apply_deletes",
    "build_manifest",
    "build_status",
    "collect_status",
    "commit_parts",
    "config_from_mapping",
    "fetch_step",
    "load_config",
    "open_tiers",
    "parse_step",
    "plan",
    "promote_step",
    "render_table",
    "restore_options",
    "rules_for",
    "snapshot",
    "stage_step",
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

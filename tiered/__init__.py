"""tiered: two-tier checkpointing for JAX training.

The public surface: what a training script, a notebook or an operator's tool imports. The
sidecar's plumbing is in ``tiered.sidecar``. Only the exception tree is imported eagerly; every
other name (``CheckpointManager`` with jax and orbax, the config with pydantic, the tiers with
fsspec) is loaded when first used. Their types are in ``__init__.pyi``, for type checkers: an
import under ``TYPE_CHECKING`` here would be an edge from ``tiered`` to jax and orbax in the
import graph that import-linter checks.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from tiered.errors import (
    AgreementTimeout,
    AlreadyRunning,
    ChecksumMismatch,
    CommitError,
    ConfigError,
    LayoutError,
    NotFound,
    PeerProtocolMismatch,
    PeerRefused,
    ReplicatorConfigError,
    StepExists,
    StepUnreadable,
    StorageError,
    TieredError,
)

_LAZY = {
    "TieredConfig": "tiered.config",
    "config_from_mapping": "tiered.config_check",
    "load_config": "tiered.config_files",
    "CheckpointManager": "tiered.manager",
    "Restored": "tiered.manager",
    "Manifest": "tiered.manifest",
    "TierStatus": "tiered.report",
    "collect_status": "tiered.status_client",
    "DurableTier": "tiered.storage",
    "LocalTier": "tiered.storage",
    "fetch_step": "tiered.tiers",
    "promote_step": "tiered.tiers",
}
"""Public names loaded on first use: ``import tiered`` (and ``import tiered.types``) costs the
exception tree only, never pydantic, fsspec, jax or a storage module (tests/test_structure.py)."""

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
    "PeerProtocolMismatch",
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


def status(config: Any) -> Any:  # typed in __init__.pyi
    """The tier status, as ``tiered status --json`` reports it."""
    from tiered.config import TieredConfig
    from tiered.config_files import load_config
    from tiered.status_client import collect_status

    cfg = config if isinstance(config, TieredConfig) else load_config(config)
    return collect_status(cfg)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tiered' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

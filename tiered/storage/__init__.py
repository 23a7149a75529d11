"""The two tiers as storage: list steps, move one step between tiers, delete one step.

    errormap   the one table from fsspec, OS and network errors to tiered's
    transfer   what an upload moves (pure), and the memory, bandwidth and thread bounds
    stores     how a backend is written: POSIX (rename) or object store (precondition)
    local      the local tier: step directories under plain OS calls
    durable    the durable tier: a step uploaded, verified, committed, restored, deleted
    upload     a step promoted: planned, uploaded, verified, committed (or its part written)
    download   a step restored: verified, renamed into place
    parts      multi-node steps: one part per node, committed by node 0 as one checkpoint
    merge      the merged OCDBT root of a multi-node step (a child process, tensorstore only)

Everything above this package sees tiered's errors only (``translate_errors``).
"""

from tiered.storage.durable import DurableTier
from tiered.storage.errormap import translate_errors
from tiered.storage.local import LocalTier, read_step_metadata
from tiered.storage.transfer import (
    Progress,
    RemoteFile,
    TransferPlan,
    TransferResult,
    copy_with_digest,
    plan_transfer,
)

__all__ = [
    "DurableTier",
    "LocalTier",
    "Progress",
    "RemoteFile",
    "TransferPlan",
    "TransferResult",
    "copy_with_digest",
    "plan_transfer",
    "read_step_metadata",
    "translate_errors",
]

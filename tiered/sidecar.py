"""The library's surface for the sidecar daemon (``daemon/``): the plumbing it drives, which users
of the library do not import. The daemon imports ``tiered`` and this module only, so the layers
below can be rearranged without touching it (``make lint`` checks that it does)."""

from tiered.atomic import publish_file
from tiered.coord import Decision, Rendezvous
from tiered.integrations import (
    checkpoint_facts,
    last_blocking_seconds,
    summary_writer,
    write_scalars,
)
from tiered.layout import (
    COMMIT_MARKER,
    JAX_INIT_INFO,
    PEER_NONCES,
    REPLICATOR_ERRORS,
    REPLICATOR_FAILED,
    REPLICATOR_FILE,
    RESTORE_SUFFIX,
    TIERED_DIR,
    TRAINER_LOCK_NAME,
    is_tmp_name,
    parse_restore,
    parse_step,
    restore_name,
    staging_path,
)
from tiered.lock import DirectoryLock
from tiered.logs import configure
from tiered.manifest import Manifest
from tiered.peerauth import (
    PROTOCOL_VERSION,
    VERSION_HEADER,
    NonceRecord,
    PeerAuth,
    job_identity,
)
from tiered.peering import (
    PeerClient,
    clients_for,
    header_for,
    listen_address,
    load_secret,
    partners,
)
from tiered.policy import (
    Abandon,
    Commit,
    Delete,
    Displace,
    Fingerprint,
    ForgetPart,
    FullSpeed,
    Plan,
    RestoreOption,
    Rules,
    Snapshot,
    Upload,
    plan,
    replication_pace,
    restore_choice_ready,
    restore_options,
    rules_for,
)
from tiered.progress import LogProgress
from tiered.reach import within
from tiered.report import TierStatus, build_status
from tiered.risk import held_by_every_peer, risk_now
from tiered.storage import TransferResult
from tiered.storage.replicas import PeerStore, read_header
from tiered.storage.replicas import encode as replica_stream
from tiered.storage.transfer import RateLimiter
from tiered.tiers import (
    PeerSetup,
    agree,
    apply_deletes,
    commit_parts,
    go_on_from,
    open_durable,
    promote_step,
    stage_step,
)
from tiered.types import Displaced, DurableStep, Topology, as_reason

__all__ = [
    "COMMIT_MARKER",
    "JAX_INIT_INFO",
    "PEER_NONCES",
    "PROTOCOL_VERSION",
    "REPLICATOR_ERRORS",
    "REPLICATOR_FAILED",
    "REPLICATOR_FILE",
    "RESTORE_SUFFIX",
    "TIERED_DIR",
    "TRAINER_LOCK_NAME",
    "VERSION_HEADER",
    "Abandon",
    "Commit",
    "Decision",
    "Delete",
    "DirectoryLock",
    "Displace",
    "Displaced",
    "DurableStep",
    "Fingerprint",
    "ForgetPart",
    "FullSpeed",
    "LogProgress",
    "Manifest",
    "NonceRecord",
    "PeerAuth",
    "PeerClient",
    "PeerSetup",
    "PeerStore",
    "Plan",
    "RateLimiter",
    "Rendezvous",
    "RestoreOption",
    "Rules",
    "Snapshot",
    "TierStatus",
    "Topology",
    "TransferResult",
    "Upload",
    "agree",
    "apply_deletes",
    "as_reason",
    "build_status",
    "checkpoint_facts",
    "clients_for",
    "commit_parts",
    "configure",
    "go_on_from",
    "header_for",
    "held_by_every_peer",
    "is_tmp_name",
    "job_identity",
    "last_blocking_seconds",
    "listen_address",
    "load_secret",
    "open_durable",
    "parse_restore",
    "parse_step",
    "partners",
    "plan",
    "promote_step",
    "publish_file",
    "read_header",
    "replica_stream",
    "replication_pace",
    "restore_choice_ready",
    "restore_name",
    "restore_options",
    "risk_now",
    "rules_for",
    "stage_step",
    "staging_path",
    "summary_writer",
    "within",
    "write_scalars",
]

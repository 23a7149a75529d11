"""Every decision about a step, as pure functions over one snapshot.

``plan(snapshot, rules)`` answers, for every step on either tier, "what happens to it next, and
why": a ``Verdict`` per step and a list of typed actions (``Fingerprint``, ``Upload``,
``Displace``, ``Commit``, ``ForgetPart``, ``Abandon``, ``Skip``, ``Delete``). The daemon, the CLI
and the status all call it; nothing else decides. ``restore_options`` is the one restore choice
(the training API, orbax's multi-tier protocol, ``tiered restore`` and the status use it), and
``agree_step`` its form for several nodes. Nothing here does I/O or reads the clock: the time
comes in ``Snapshot.now``.

What happens to step N, in order:

1. **Identity.** A durable step is the copy of local step N only when both identities (manifest
   digests) are known and equal. A committed durable step without a readable manifest is
   ``foreign``: never a copy, never restored from, never deleted.
2. **Owed.** A committed local step that is not a copy is owed to the durable tier when its
   reason is preemption or final, when N is a positive multiple of the durable period, when the
   backup interval has passed since the step that is durable before it (or the clock jumped
   back), or when it is the newest local step of a run that ended (the trainer's lock was
   released, the daemon drains with no trainer, or, with no lock to tell, nothing was saved for
   ``final_after_idle_seconds`` and three usual save intervals).
3. **Not wanted after all.** An owed step is skipped when durable retention would delete it at
   once (``superseded`` by steps already committed), when this daemon pruned the same content
   from the durable tier before, or when ``backlog: newest`` passes over it. A skipped step is no
   longer pinned locally.
4. **Next action for a wanted step:** checksum it (``Fingerprint``) when its identity is not
   known yet; move a durable step of the same number but other content out of the way
   (``Displace``, node 0 only) before uploading; otherwise ``Upload``, newest first, preemption
   and final steps before periodic ones. A step being worked on, failed (kept for a human), or
   waiting for its retry time gets no action.
5. **Several nodes.** A part this node uploaded waits for node 0's ``Commit``; it is forgotten
   once committed, gone, or from an older restore epoch, and abandoned when a newer step became
   durable without it.
6. **Retention.** Local: the newest ``local_max_to_keep`` committed steps (only the newest one
   under disk pressure) plus every pinned step (owed and not yet a copy, being worked on, staged
   for restore, failed, or waiting for its commit). Durable (node 0 only, and only while the
   durable tier could be listed): the newest ``max_num_checkpoints_to_keep`` own steps, every
   multiple of ``keep_period``, and always the newest; partial uploads older than the newest
   committed step that nothing can finish.

Retention rules are small frozen dataclasses (``LatestN``, ``EveryNSteps``, ``Steps``) combined
with ``AnyOf``; each takes the steps, oldest first, and returns a keep-mask aligned with them.

The package: ``inputs`` (``Rules``, ``Snapshot``), ``actions`` (what ``plan`` answers),
``planner`` (``plan``, ``rules_for``), ``restore`` (the restore choice), ``cadence`` (when the
training API saves), ``retention`` and ``pacing``. Import from ``tiered.policy``.
"""

from tiered.policy.actions import (
    Abandon,
    Action,
    Commit,
    Delete,
    Displace,
    Fingerprint,
    ForgetPart,
    FullSpeed,
    Plan,
    RestoreOption,
    Skip,
    State,
    Tier,
    Upload,
    Verdict,
)
from tiered.policy.cadence import is_periodic, save_reason
from tiered.policy.inputs import Pacing, Rules, Snapshot
from tiered.policy.pacing import Pace, replication_pace, seconds_per_step, upload_pace
from tiered.policy.planner import owed_steps, plan, rules_for
from tiered.policy.restore import (
    FIRST_LISTING_WAIT_SECONDS,
    agree_step,
    may_read_in_place,
    newer_than,
    restore_choice_ready,
    restore_options,
    save_over,
)
from tiered.policy.retention import (
    DISPLACED_KEEP,
    AnyOf,
    EveryNSteps,
    KeepAll,
    LatestN,
    PreservationRule,
    Steps,
)

__all__ = [
    "DISPLACED_KEEP",
    "FIRST_LISTING_WAIT_SECONDS",
    "Abandon",
    "Action",
    "AnyOf",
    "Commit",
    "Delete",
    "Displace",
    "EveryNSteps",
    "Fingerprint",
    "ForgetPart",
    "FullSpeed",
    "KeepAll",
    "LatestN",
    "Pace",
    "Pacing",
    "Plan",
    "PreservationRule",
    "RestoreOption",
    "Rules",
    "Skip",
    "Snapshot",
    "State",
    "Steps",
    "Tier",
    "Upload",
    "Verdict",
    "agree_step",
    "is_periodic",
    "may_read_in_place",
    "newer_than",
    "owed_steps",
    "plan",
    "replication_pace",
    "restore_choice_ready",
    "restore_options",
    "rules_for",
    "save_over",
    "save_reason",
    "seconds_per_step",
    "upload_pace",
]

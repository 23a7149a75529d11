"""The daemon's work off the loop thread: each function builds a ``Job`` for a lane.

A job runs on its lane's thread, touches the tiers, and returns a value (or raises); it never
reads or changes the daemon's state, which only the loop thread replaces when it applies the
job's ``Outcome`` (``daemon.service``).
"""

from __future__ import annotations

import logging
import random
import threading
import time

from daemon.workers import Job, Progress
from tiered import DurableTier, LocalTier, StorageError, TieredConfig, TieredError
from tiered.sidecar import (
    Commit,
    Delete,
    Displace,
    DurableStep,
    LogProgress,
    Manifest,
    PeerSetup,
    RateLimiter,
    Rendezvous,
    TransferResult,
    Upload,
    agree,
    apply_deletes,
    as_reason,
    commit_parts,
    promote_step,
    stage_step,
    within,
)

log = logging.getLogger(__name__)


class PartlyDone(Exception):
    """A batch of deletions stopped part way: what was done, and why it stopped."""

    def __init__(self, done: list[Delete], error: BaseException) -> None:
        super().__init__(str(error))
        self.done = done
        self.error = error


def pacer(cap_mb_per_s: float | None, pace_bytes_per_s: float | None) -> RateLimiter | None:
    """The limiter for one transfer: the slower of the configured cap and the plan's pace."""
    rates = [r for r in (cap_mb_per_s and cap_mb_per_s * 1e6, pace_bytes_per_s) if r]
    return RateLimiter(min(rates)) if rates else None


def upload(cfg: TieredConfig, local: LocalTier, durable: DurableTier, todo: Upload) -> Job:
    """Promote one step at the plan's pace, retrying transient storage errors with jittered
    backoff."""
    tiered = cfg.tiered
    limiter = pacer(tiered.upload_bandwidth_mb_per_s, todo.bytes_per_s)

    def run(progress: Progress) -> TransferResult:
        for attempt in range(1, tiered.retry_attempts + 1):
            progress.attempt = attempt
            try:
                return promote_step(
                    local,
                    durable,
                    todo.step,
                    progress=progress,
                    reason=todo.reason,
                    limiter=limiter,
                )
            except StorageError as err:
                if not err.transient or attempt == tiered.retry_attempts:
                    raise
                delay = random.uniform(
                    0, min(tiered.retry_max_seconds, tiered.retry_initial_seconds * 2**attempt)
                )
                log.warning(
                    "Promotion of step %d failed (attempt %d/%d), retrying in %.1f s: %s",
                    todo.step,
                    attempt,
                    tiered.retry_attempts,
                    delay,
                    err,
                )
                time.sleep(delay)
        raise StorageError(f"step {todo.step}: no attempts configured", transient=False)

    return Job("upload", todo.step, run, data=todo, pacer=limiter)


def displace(durable: DurableTier, todo: Displace) -> Job:
    return Job(
        "displace",
        todo.step,
        lambda _p: durable.displace_step(todo.step, now=time.time()),
        data=todo,
    )


def fingerprint(local: LocalTier, step: int) -> Job:
    return Job("fingerprint", step, lambda _p: local.manifest(step))


CommitResult = tuple[Commit, list[int] | BaseException, Manifest | None]


def commit(local: LocalTier, durable: DurableTier, commits: list[Commit]) -> Job:
    """Try every waiting commit in one job, so no step waits behind another."""

    def run(_p: Progress) -> list[CommitResult]:
        out: list[CommitResult] = []
        for c in commits:
            try:
                missing = commit_parts(local, durable, c.step, epoch=c.epoch)
            except (TieredError, OSError) as err:
                out.append((c, err, None))
                continue
            out.append((c, missing, None if missing else local.cached_manifest(c.step)))
        return out

    return Job("commit", None, run, data=commits)


def delete(local: LocalTier, durable: DurableTier, deletes: list[Delete]) -> Job:
    def run(_p: Progress) -> list[Delete]:
        done: list[Delete] = []
        try:
            for d in deletes:
                done += apply_deletes([d], local, durable)
        except (StorageError, OSError) as err:
            raise PartlyDone(done, err) from err
        return done

    return Job("delete", None, run, data=deletes)


def listing(durable: DurableTier, *, version: int, timeout: float) -> Job:
    """The durable tier listed: its steps, the restore epoch, what was moved aside."""

    def scan() -> tuple[list[DurableStep], int, list]:
        durable.check()  # a missing bucket says so, instead of listing as empty
        steps = durable.scan()
        epoch = Rendezvous(durable).current_epoch() if durable.topology.multi else 0
        return steps, epoch, durable.list_displaced()

    def run(_p: Progress) -> tuple[list[DurableStep], int, list]:
        # Storage clients retry on their own for a minute or more (gcsfs: six tries);
        # readiness should not wait that long to say the store is away.
        return within(timeout, scan)

    return Job("list", None, run, data=version)


def stage(local: LocalTier, durable: DurableTier, step: int) -> Job:
    def run(_progress: object) -> object:
        shown = LogProgress(f"staging step {step} for restore", logger=log)
        return stage_step(local, durable, step, progress=shown)

    return Job("stage", step, run)


def agreement(
    local: LocalTier,
    durable: DurableTier,
    *,
    timeout: float,
    stopping: threading.Event,
    peers: PeerSetup | None = None,
) -> Job:
    return Job(
        "agree",
        None,
        lambda _p: agree(local, durable, timeout=timeout, should_stop=stopping.is_set, peers=peers),
    )


def durable_fact(step: int, manifest: Manifest | None) -> DurableStep:
    """What the durable tier holds right after this daemon committed ``step`` from ``manifest``
    (the next listing says the same; until then the planner must not plan the step again)."""
    if manifest is None:  # the kept manifest went away meanwhile: the listing will tell
        return DurableStep(step=step, committed=True, problem="not listed yet")
    return DurableStep(
        step=step,
        committed=True,
        identity=manifest.copy_identity,
        reason=as_reason(manifest.reason),
        commit_time=manifest.commit_time,
        size=manifest.total_bytes,
    )

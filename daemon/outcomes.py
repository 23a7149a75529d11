"""The loop thread's half of the tiers' jobs: an ``Outcome`` posted by a lane becomes a new
``DaemonState`` value. Each handler takes the state and returns the next; only the loop thread
runs them, so the state is never changed from two threads."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from daemon import jobs
from daemon.metrics import Metrics
from daemon.settings import Settings
from daemon.state import DaemonState, Promotion, with_item, without
from daemon.workers import Outcome
from tiered import (
    ChecksumMismatch,
    CommitError,
    LayoutError,
    LocalTier,
    StepExists,
    StorageError,
    TieredError,
)
from tiered.sidecar import Commit, Delete, Manifest, TransferResult, Upload

log = logging.getLogger("daemon")

Handler = Callable[[DaemonState, Outcome], DaemonState]
"""The loop's half of one kind of job: the state before the outcome, and after."""


class Outcomes:
    """The reducers of the tiers' jobs (listing, upload, moving aside, checksum, commit,
    deletion): each counts in ``metrics``, logs, and returns the next state."""

    def __init__(self, settings: Settings, local: LocalTier, metrics: Metrics) -> None:
        self._settings = settings
        self._local = local
        self._metrics = metrics

    def handlers(self) -> dict[str, Handler]:
        """Each job kind (``daemon.jobs``) this reduces, with its handler."""
        return {
            "list": self.on_list,
            "upload": self.on_upload,
            "displace": self.on_displace,
            "fingerprint": self.on_fingerprint,
            "commit": self.on_commit,
            "delete": self.on_delete,
        }

    def on_list(self, state: DaemonState, outcome: Outcome) -> DaemonState:
        now_mono = time.monotonic()
        if outcome.error is not None:
            err = outcome.error
            if not isinstance(err, TieredError | OSError):
                raise err
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            failures = state.list_failures + 1
            if message != state.durable_error or failures % 20 == 0:
                log.warning(
                    "The durable tier does not answer (%d attempt%s; the local tier is kept, "
                    "nothing owed is pruned): %s",
                    failures,
                    "" if failures == 1 else "s",
                    message,
                )
            self._metrics.errors.labels(kind="list").inc()
            return replace(
                state.error("list", message, time.time()),
                durable=None,
                durable_error=message,
                listed_at=now_mono,
                list_failures=failures,
            )
        steps, epoch, displaced = outcome.value
        if outcome.job.data != state.durable_version:
            # We wrote the durable tier while this listing ran: it may predate the write.
            return replace(state, scan_requested=True)
        if state.list_failures:
            log.info(
                "The durable tier answers again, after %d failed attempts", state.list_failures
            )
        return replace(
            state,
            durable=tuple(steps),
            durable_error=None,
            list_failures=0,
            listed_at=now_mono,
            epoch=epoch,
            displaced=tuple(displaced),
        )

    def on_upload(self, state: DaemonState, outcome: Outcome) -> DaemonState:
        upload: Upload = outcome.job.data
        step, now = upload.step, time.time()
        if outcome.error is not None:
            return self._failed(state, "upload", step, outcome.error, now)
        result: TransferResult = outcome.value
        self._metrics.promoted.inc()
        self._metrics.bytes_uploaded.inc(result.bytes_moved)
        self._metrics.upload_seconds.observe(result.seconds)
        state = replace(
            state,
            failing_since=None,
            failures=without(state.failures, step),
            retry_at=without(state.retry_at, step),
            last_promotion=Promotion(
                step=step,
                time=now,
                seconds=round(result.seconds, 3),
                bytes=result.bytes_total,
                mb_per_s=round(result.mb_per_s, 1),
            ),
        )
        if not result.committed:
            return replace(state, parts=with_item(state.parts, step, result.epoch))
        return state.durable_with(jobs.durable_fact(step, result.manifest))

    def _failed(
        self, state: DaemonState, kind: str, step: int, err: BaseException, now: float
    ) -> DaemonState:
        """The state after a step's job failed: conflicts and vanished steps are re-planned,
        permanent errors mark the step failed, transient ones back off."""
        if isinstance(err, StepExists) or (kind == "move aside" and isinstance(err, CommitError)):
            # The durable listing was out of date: wait for a fresh one before trying again.
            log.warning("Step %d: %s; listing the durable tier again", step, err)
            retry = now + self._settings.cfg.tiered.retry_initial_seconds
            return replace(
                state, scan_requested=True, retry_at=with_item(state.retry_at, step, retry)
            )
        if isinstance(err, FileNotFoundError) and not self._local.step_dir(step).exists():
            log.warning("Step %d left the local tier during its %s: %s", step, kind, err)
            return replace(state, scan_requested=True)
        if not isinstance(err, TieredError | OSError):
            raise err
        permanent = isinstance(err, ChecksumMismatch | LayoutError | CommitError) or (
            isinstance(err, StorageError) and not err.transient
        )
        self._metrics.errors.labels(kind="permanent" if permanent else "transient").inc()
        state = state.error(kind, f"step {step}: {err}", now)
        if permanent:
            log.error(
                "%s of step %d failed permanently; its local copy is kept: %s",
                kind.capitalize(),
                step,
                err,
            )
            return replace(state, failed=with_item(state.failed, step, str(err)))
        failures = state.failures.get(step, 0) + 1
        tiered = self._settings.cfg.tiered
        delay = min(tiered.retry_max_seconds, tiered.retry_initial_seconds * 2 ** (failures - 1))
        log.warning("%s of step %d failed, will retry in %.0f s: %s", kind, step, delay, err)
        return replace(
            state,
            failures=with_item(state.failures, step, failures),
            retry_at=with_item(state.retry_at, step, now + delay),
            scan_requested=True,
        )

    def on_displace(self, state: DaemonState, outcome: Outcome) -> DaemonState:
        step, now = outcome.job.step or 0, time.time()
        if outcome.error is not None:
            return self._failed(state, "move aside", step, outcome.error, now)
        log.warning(
            "Moved durable step %d aside to %s/.tiered/displaced/%s",
            step,
            self._settings.durable.url,
            outcome.value,
        )
        return replace(state.durable_without(step), scan_requested=True)

    def on_fingerprint(self, state: DaemonState, outcome: Outcome) -> DaemonState:
        step = outcome.job.step or 0
        if outcome.error is not None:
            return self._failed(state, "checksum", step, outcome.error, time.time())
        return state

    def on_commit(self, state: DaemonState, outcome: Outcome) -> DaemonState:
        if outcome.error is not None:
            err = outcome.error
            if not isinstance(err, TieredError | OSError):
                raise err
            return state.error("commit", str(err), time.time())
        for commit, result, manifest in outcome.value:
            state = self._commit_result(state, commit, result, manifest)
        return state

    def _commit_result(
        self,
        state: DaemonState,
        commit: Commit,
        result: list[int] | BaseException,
        manifest: Manifest | None,
    ) -> DaemonState:
        if isinstance(result, BaseException):
            log.warning("Cannot commit step %d: %s", commit.step, result)
            return state.error("commit", f"step {commit.step}: {result}", time.time())
        if result:
            if tuple(result) != state.missing.get(commit.step):
                log.info("Step %d: waiting for the parts of nodes %s", commit.step, result)
            return replace(state, missing=with_item(state.missing, commit.step, tuple(result)))
        state = replace(
            state,
            parts=without(state.parts, commit.step),
            missing=without(state.missing, commit.step),
            scan_requested=True,
        )
        return state.durable_with(jobs.durable_fact(commit.step, manifest))

    def on_delete(self, state: DaemonState, outcome: Outcome) -> DaemonState:
        err = outcome.error
        done: list[Delete] = outcome.value or []
        if isinstance(err, jobs.PartlyDone):
            done, err = err.done, err.error
        now = time.time()
        identities = {d.step: d.identity for d in state.durable or () if d.identity}
        for d in done:
            self._metrics.pruned.labels(tier=d.tier).inc()
            state = state.pruned_now(d.tier, d.step, now)
            pruned = state.pruned
            if d.step in identities and d.why.startswith("max_num"):
                pruned = with_item(pruned, d.step, identities[d.step])
            state = replace(state.durable_without(d.step), pruned=pruned)
        if err is not None:
            if not isinstance(err, TieredError | OSError):
                raise err
            log.warning("Pruning the durable tier stopped: %s", err)
            state = state.error("prune", str(err), now)
        return state

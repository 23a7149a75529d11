"""The loop thread's half of each job, and orbax's multi-tier protocol: an ``Outcome`` posted
by a lane becomes a new ``DaemonState`` value. Only the loop thread runs these, so the state is
never changed from two threads."""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import replace

from daemon import jobs
from daemon.base import DaemonBase
from daemon.state import DaemonState, Promotion, with_item, without
from daemon.workers import Outcome
from tiered import (
    ChecksumMismatch,
    CommitError,
    LayoutError,
    StepExists,
    StorageError,
    TieredError,
)
from tiered.sidecar import (
    Commit,
    Decision,
    Delete,
    Manifest,
    PeerSetup,
    RestoreOption,
    TransferResult,
    Upload,
    go_on_from,
    open_durable,
    restore_choice_ready,
    restore_options,
    rules_for,
)

log = logging.getLogger("daemon")

FRESH = RestoreOption(step=0, source="local")
"""The restore choice "no checkpoint anywhere: start fresh"."""


class Outcomes(DaemonBase):
    """Part of ``Daemon``: applying what its jobs return."""

    def _apply_outcomes(self) -> None:
        while True:
            try:
                outcome = self.outbox.get_nowait()
            except queue.Empty:
                return
            handler = getattr(self, f"_on_{outcome.job.kind}")
            handler(outcome)

    def _on_list(self, outcome: Outcome) -> None:
        now_mono = time.monotonic()
        if outcome.error is not None:
            err = outcome.error
            if not isinstance(err, TieredError | OSError):
                raise err
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            failures = self.state.list_failures + 1
            if message != self.state.durable_error or failures % 20 == 0:
                log.warning(
                    "The durable tier does not answer (%d attempt%s; the local tier is kept, "
                    "nothing owed is pruned): %s",
                    failures,
                    "" if failures == 1 else "s",
                    message,
                )
            self.state = replace(
                self.state.error("list", message, time.time()),
                durable=None,
                durable_error=message,
                listed_at=now_mono,
                list_failures=failures,
            )
            self.metrics.errors.labels(kind="list").inc()
            return
        steps, epoch, displaced = outcome.value
        if outcome.job.data != self.state.durable_version:
            # We wrote the durable tier while this listing ran: it may predate the write.
            self.state = replace(self.state, scan_requested=True)
            return
        if self.state.list_failures:
            log.info(
                "The durable tier answers again, after %d failed attempts",
                self.state.list_failures,
            )
        self.state = replace(
            self.state,
            durable=tuple(steps),
            durable_error=None,
            list_failures=0,
            listed_at=now_mono,
            epoch=epoch,
            displaced=tuple(displaced),
        )

    def _on_upload(self, outcome: Outcome) -> None:
        upload: Upload = outcome.job.data
        step, now = upload.step, time.time()
        state = self.state
        if outcome.error is None:
            result: TransferResult = outcome.value
            self.metrics.promoted.inc()
            self.metrics.bytes_uploaded.inc(result.bytes_moved)
            self.metrics.upload_seconds.observe(result.seconds)
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
            manifest = result.manifest
            if not result.committed:
                state = replace(state, parts=with_item(state.parts, step, result.epoch))
            else:
                state = state.durable_with(jobs.durable_fact(step, manifest))
            self.state = state
            return
        self.state = self._failed(state, "upload", step, outcome.error, now)

    def _failed(
        self, state: DaemonState, kind: str, step: int, err: BaseException, now: float
    ) -> DaemonState:
        """The state after a step's job failed: conflicts and vanished steps are re-planned,
        permanent errors mark the step failed, transient ones back off."""
        if isinstance(err, StepExists) or (kind == "move aside" and isinstance(err, CommitError)):
            # The durable listing was out of date: wait for a fresh one before trying again.
            log.warning("Step %d: %s; listing the durable tier again", step, err)
            retry = now + self.cfg.tiered.retry_initial_seconds
            return replace(
                state, scan_requested=True, retry_at=with_item(state.retry_at, step, retry)
            )
        if isinstance(err, FileNotFoundError) and not self.local.step_dir(step).exists():
            log.warning("Step %d left the local tier during its %s: %s", step, kind, err)
            return replace(state, scan_requested=True)
        if not isinstance(err, TieredError | OSError):
            raise err
        permanent = isinstance(err, ChecksumMismatch | LayoutError | CommitError) or (
            isinstance(err, StorageError) and not err.transient
        )
        self.metrics.errors.labels(kind="permanent" if permanent else "transient").inc()
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
        tiered = self.cfg.tiered
        delay = min(tiered.retry_max_seconds, tiered.retry_initial_seconds * 2 ** (failures - 1))
        log.warning("%s of step %d failed, will retry in %.0f s: %s", kind, step, delay, err)
        return replace(
            state,
            failures=with_item(state.failures, step, failures),
            retry_at=with_item(state.retry_at, step, now + delay),
            scan_requested=True,
        )

    def _on_displace(self, outcome: Outcome) -> None:
        step, now = outcome.job.step or 0, time.time()
        if outcome.error is not None:
            self.state = self._failed(self.state, "move aside", step, outcome.error, now)
            return
        log.warning(
            "Moved durable step %d aside to %s/.tiered/displaced/%s",
            step,
            self.durable.url,
            outcome.value,
        )
        self.state = replace(self.state.durable_without(step), scan_requested=True)

    def _on_fingerprint(self, outcome: Outcome) -> None:
        step = outcome.job.step or 0
        if outcome.error is not None:
            self.state = self._failed(self.state, "checksum", step, outcome.error, time.time())

    def _on_commit(self, outcome: Outcome) -> None:
        if outcome.error is not None:
            err = outcome.error
            if not isinstance(err, TieredError | OSError):
                raise err
            self.state = self.state.error("commit", str(err), time.time())
            return
        for commit, result, manifest in outcome.value:
            self._commit_result(commit, result, manifest)

    def _commit_result(
        self, commit: Commit, result: list[int] | BaseException, manifest: Manifest | None
    ) -> None:
        state = self.state
        if isinstance(result, BaseException):
            log.warning("Cannot commit step %d: %s", commit.step, result)
            self.state = state.error("commit", f"step {commit.step}: {result}", time.time())
            return
        if result:
            if tuple(result) != state.missing.get(commit.step):
                log.info("Step %d: waiting for the parts of nodes %s", commit.step, result)
            missing_now = with_item(state.missing, commit.step, tuple(result))
            self.state = replace(state, missing=missing_now)
            return
        state = replace(
            state,
            parts=without(state.parts, commit.step),
            missing=without(state.missing, commit.step),
            scan_requested=True,
        )
        self.state = state.durable_with(jobs.durable_fact(commit.step, manifest))

    def _on_delete(self, outcome: Outcome) -> None:
        err = outcome.error
        done: list[Delete] = outcome.value or []
        if isinstance(err, jobs.PartlyDone):
            done, err = err.done, err.error
        state = self.state
        now = time.time()
        identities = {d.step: d.identity for d in state.durable or () if d.identity}
        for d in done:
            self.metrics.pruned.labels(tier=d.tier).inc()
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
        self.state = state

    def _on_stage(self, outcome: Outcome) -> None:
        step = outcome.job.step or 0
        assert self.mtc is not None
        if outcome.error is not None:
            self._restore_failed(outcome.error)
            return
        self.mtc.offer(step, source="durable")
        self.restore_choice = None

    def _on_agree(self, outcome: Outcome) -> None:
        assert self.mtc is not None
        if outcome.error is not None:
            self._restore_failed(outcome.error)
            return
        decision: Decision = outcome.value
        self.state = replace(self.state, epoch=decision.epoch, scan_requested=True)
        go_on_from(self.local, decision.step)
        if decision.step is None:
            self.restore_choice = FRESH
        else:
            holds = self.topology.rank in decision.holders
            self.restore_choice = RestoreOption(decision.step, "local" if holds else "durable")

    def _restore_failed(self, err: BaseException) -> None:
        assert self.mtc is not None
        if not isinstance(err, TieredError | OSError):
            raise err
        log.error("Restore for the multi-tier client failed: %s", err)
        self.state = self.state.error("restore", str(err), time.time())
        self.mtc.fail(f"restore failed: {err}")
        self.restore_choice = None

    # -- orbax's multi-tier protocol ------------------------------------------------------------

    def _mtc_cycle(self) -> None:
        mtc = self.mtc
        assert mtc is not None
        accepted = mtc.consume()
        if accepted is not None:
            self.cfg = self.cfg.with_durable_period(
                steps=accepted.backup_interval_steps, minutes=accepted.backup_interval_minutes
            )
            topology = mtc.topology or self.topology
            if topology != self.topology:
                # A new value for the jobs submitted from now on; running ones keep theirs.
                self.topology = topology
                self.durable = open_durable(self.cfg, topology=topology)
            self.rules = rules_for(self.cfg, topology=self.topology)
            self.restore_choice = None
            self.state = replace(self.state, scan_requested=True)
            # The client writes replicator.yaml after jax.distributed.initialize: its coordinator
            # is up now. Probe in this cycle, not up to 2 s later; a short run can be gone by
            # then, and a run never seen is never known to have ended (no final step).
            self._probed_at = 0.0
        if mtc.pending_restore is None or self.transfer.job is not None:
            return  # nothing asked; or an upload, a staging or an agreement is running
        if self.restore_choice is None:
            if self.topology.multi:
                self.transfer.submit(
                    jobs.agreement(
                        self.local,
                        self.durable,
                        timeout=self.cfg.tiered.restore_agreement_timeout_seconds,
                        stopping=self.stopping,
                        peers=PeerSetup(
                            self.cfg, explicit=mtc.active.peer_ranks if mtc.active else None
                        ),
                    )
                )
                return
            if not restore_choice_ready(
                durable_listed=self.state.durable is not None,
                waited_seconds=time.monotonic() - self._started_mono,
            ):
                return  # give the first durable listing a chance: it may hold a newer step
            local = self.local.scan()
            options = restore_options(local, self.state.durable or (), nodes=self.topology.nodes)
            self.restore_choice = options[0] if options else FRESH
        choice = self.restore_choice
        if choice == FRESH:
            mtc.offer_fresh()
            self.restore_choice = None
        elif choice.source == "local":
            if self.local_lane.job is not None and self.local_lane.job.step == choice.step:
                return  # being checksummed: its files must not move now
            mtc.stage_local(self.local, choice.step)
            mtc.offer(choice.step, source="local")
            self.restore_choice = None
        else:
            self.transfer.submit(jobs.stage(self.local, self.durable, choice.step))

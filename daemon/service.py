"""The service loop: snapshot, plan, execute; and the lock, the drain and the entry point.

Every cycle the loop thread
1. checks that it still holds its lock (by inode: a removed ``.tiered/`` would otherwise let a
   second daemon in);
2. applies the outcomes the worker lanes posted (``daemon.workers``): it is the only thread that
   changes the daemon's state, a ``DaemonState`` value it replaces;
3. answers orbax's multi-tier protocol files;
4. takes a snapshot (the local tier scanned now, the durable tier as last listed) and asks
   ``tiered.policy.plan`` what to do;
5. executes the plan: local deletions at once, everything that touches the durable tier or
   reads a whole step on an idle lane.

All state that matters is derived from the two tiers, so a daemon killed with -9 and restarted
rescans and carries on: partial uploads are completed (files already there with the right
checksum are skipped) and never taken for checkpoints, because the commit marker goes last.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import queue
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from daemon.http import StatusServer
from daemon.metrics import Metrics
from daemon.mtc import MtcProtocol
from daemon.state import DaemonState, Promotion, with_item, without
from daemon.workers import Job, Lane, Outcome, Progress
from tiered import (
    ChecksumMismatch,
    CommitError,
    LayoutError,
    LocalTier,
    StorageError,
    TieredConfig,
    TieredError,
    TransferResult,
    build_status,
    stage_step,
)
from tiered.coord import Decision, Rendezvous
from tiered.errors import StepExists
from tiered.layout import TRAINER_LOCK_NAME, is_tmp_name
from tiered.lock import AlreadyRunning, DaemonLock
from tiered.manifest import Manifest
from tiered.ops import (
    agree,
    apply_deletes,
    commit_parts,
    open_durable,
    promote_step,
    set_aside_newer,
)
from tiered.policy import (
    Abandon,
    Commit,
    Delete,
    Displace,
    Fingerprint,
    ForgetPart,
    Plan,
    RestoreOption,
    Snapshot,
    Upload,
    plan,
    restore_options,
    rules_for,
)
from tiered.status import within
from tiered.types import DurableStep, Topology, as_reason

log = logging.getLogger("daemon")

FRESH = RestoreOption(step=0, source="local")
"""The restore choice "no checkpoint anywhere: start fresh"."""


@dataclass(frozen=True)
class View:
    """The last cycle's snapshot and plan, for the HTTP thread."""

    snapshot: Snapshot
    decided: Plan


class Daemon:
    def __init__(self, cfg: TieredConfig) -> None:
        self.cfg = cfg
        self.topology = Topology(cfg.tiered.node_rank, cfg.tiered.num_nodes)
        self.rules = rules_for(cfg, topology=self.topology)
        self.local = LocalTier(cfg.local_dir)
        self.durable = open_durable(cfg, topology=self.topology)
        self.metrics = Metrics()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.outbox: queue.Queue[Outcome] = queue.Queue()
        self.transfer = Lane("transfer", self.outbox, self.wake)
        self.durable_lane = Lane("durable", self.outbox, self.wake)
        self.local_lane = Lane("local", self.outbox, self.wake)
        self.lock = DaemonLock(self.local.tiered_dir)
        self.trainer_lock = DaemonLock(
            self.local.tiered_dir, name=TRAINER_LOCK_NAME, what="tiered.CheckpointManager"
        )
        self.state = DaemonState()
        self.view: View | None = None
        self.draining = False
        self.mtc: MtcProtocol | None = None
        self.restore_choice: RestoreOption | None = None
        if cfg.speaks_mtc:
            init = (
                (
                    cfg.tiered.process_id
                    if cfg.tiered.process_id is not None
                    else cfg.tiered.node_rank,
                    cfg.tiered.coordinator_address,
                )
                if cfg.tiered.write_jax_init_info and cfg.tiered.coordinator_address
                else None
            )
            self.mtc = MtcProtocol(
                self.local.root,
                local_period=cfg.local_checkpoint_period,
                jax_init_info=init,
                configured=self.topology,
            )
        self._started = time.time()
        self._started_mono = time.monotonic()
        self._probed_at = 0.0
        self.heartbeat = time.monotonic()
        self._tick = min(cfg.tiered.rescan_seconds, cfg.tiered.prune_interval_seconds, 5.0)
        self.server: StatusServer | None = None
        self.watcher: Any = None

    # -- what other threads read --------------------------------------------------------------

    def alive(self) -> tuple[bool, str]:
        """Liveness: the loop is making progress. Only this is worth a restart; a store that is
        away is not (a restarted sidecar finds it just as away)."""
        quiet = time.monotonic() - self.heartbeat
        limit = max(60.0, 6 * self._tick)
        if quiet > limit:
            return False, f"the daemon's loop has not run for {quiet:.0f} s"
        return True, "alive"

    def health(self) -> tuple[bool, str]:
        """Readiness: the durable tier answers, and promotion has not been failing for longer
        than ``tiered.unhealthy_after_seconds``."""
        state = self.state
        if state.durable_error is not None:
            return False, f"the durable tier does not answer: {state.durable_error}"
        if state.durable is None:
            return False, "waiting for the durable tier's first answer"
        if state.failing_since is not None:
            failing = time.time() - state.failing_since
            if failing > self.cfg.tiered.unhealthy_after_seconds:
                message = state.last_error.message if state.last_error else "unknown"
                return False, f"promotion failing for {failing:.0f}s: {message}"
            return True, "degraded"
        return True, "ok"

    def live_state(self) -> dict[str, Any]:
        healthy, health = self.health()
        alive, _why = self.alive()
        state = self.state
        job = self.transfer.job
        current = None
        if job is not None and job.kind == "upload":
            progress = self.transfer.progress
            current = {
                "step": job.step,
                "elapsed_seconds": round(time.time() - job.started, 1),
                "bytes_done": progress.bytes_done,
                "bytes_total": progress.bytes_total,
                "attempt": progress.attempt,
            }
        promo = state.last_promotion
        view = self.view
        return {
            "running": True,
            "pid": os.getpid(),
            "health": health if healthy else "unhealthy",
            "ready": healthy,
            "ready_reason": health,
            "alive": alive,
            "loop_seconds_ago": round(time.monotonic() - self.heartbeat, 1),
            "started_at": self._started,
            "current_upload": current,
            "skipped": view.decided.skipped if view else [],
            "failed": {str(k): v for k, v in state.failed.items()},
            "last_error": state.last_error.message if state.last_error else None,
            "last_error_time": state.last_error.time if state.last_error else None,
            "last_promotion": promo.__dict__ if promo else None,
            "throughput_mb_s": promo.mb_per_s if promo else None,
            "recently_pruned": [p.__dict__ for p in state.recently_pruned],
            "disk_pressure": state.disk_pressure,
            "mtc_job": self.mtc.active.job_name if self.mtc and self.mtc.active else None,
            "node": (
                {
                    "rank": self.topology.rank,
                    "nodes": self.topology.nodes,
                    "epoch": state.epoch,
                    "committing": {
                        str(step): {"missing": list(state.missing.get(step, ())) or None}
                        for step in sorted(state.parts)
                    },
                    "abandoned": sorted(state.abandoned),
                }
                if self.topology.multi
                else None
            ),
        }

    def status_json(self) -> str:
        """The status now: the planner's verdicts over a fresh snapshot of the current state
        (planning is pure, so any thread may do it)."""
        state = self.state
        snap = self._snapshot(state)
        status = build_status(
            self.cfg,
            snapshot=snap,
            live=self.live_state(),
            decided=plan(snap, self.rules),
            durable_error=state.durable_error,
            displaced=[*state.displaced, *self.local.displaced()],
        )
        return status.to_json()

    # -- the cycle -----------------------------------------------------------------------------

    def cycle(self, *, force_rescan: bool = False) -> Plan:
        self.heartbeat = time.monotonic()
        self._check_lock()
        self._apply_outcomes()
        if force_rescan:
            self.state = replace(self.state, scan_requested=True)
        if self.mtc is not None:
            self._mtc_cycle()
        self._maybe_list_durable()
        self._check_disk()
        self._watch_trainer()
        snap = self._snapshot(self.state)
        decided = plan(snap, self.rules)
        self._execute(decided)
        self.view = View(snap, decided)
        self._record_metrics(snap, decided)
        return decided

    def _record_metrics(self, snap: Snapshot, decided: Plan) -> None:
        newest_local = max((s.commit_time or 0 for s in snap.local if s.committed), default=0)
        if newest_local:
            self.metrics.last_success.labels(tier="local").set(newest_local)
        newest = max((d.commit_time or 0 for d in snap.durable or () if d.own), default=0)
        if newest:
            self.metrics.last_success.labels(tier="durable").set(newest)
        self.metrics.backlog.set(len(decided.owed))
        self.metrics.skipped.set(len(decided.skipped))
        self.metrics.failed.set(len(self.state.failed))

    def _check_lock(self) -> None:
        if self.lock.still_held():
            return
        log.warning("The lock file %s was removed or replaced; taking it again", self.lock.path)
        self.local.ensure()
        self.lock.reacquire()  # AlreadyRunning when another daemon took it meanwhile: exit

    def _snapshot(self, state: DaemonState) -> Snapshot:
        """Both tiers as the daemon sees them now (reads only: any thread may call it)."""
        # The run is over when a trainer this daemon saw holding its lock is gone (the kernel
        # frees the lock even after kill -9), or when the daemon drains with no trainer there
        # (a client that takes no lock, such as orbax's, only ever ends that way).
        trainer_there = self.trainer_lock.holder() is not None or state.coordinator_up
        ended = not trainer_there and (state.trainer_seen or self.draining)
        busy = {job.step for job in (self.transfer.job, self.local_lane.job) if job and job.step}
        choice = self.restore_choice
        staged = frozenset({choice.step}) if choice is not None and choice != FRESH else frozenset()
        return Snapshot(
            now=time.time(),
            local=tuple(self.local.scan(with_size=True)),
            durable=state.durable,
            busy=frozenset(busy),
            staged=staged,
            failed=state.failed,
            retry_at=state.retry_at,
            parts=state.parts,
            epoch=state.epoch,
            abandoned=state.abandoned,
            pruned=state.pruned,
            disk_pressure=state.disk_pressure,
            run_ended=ended,
            trainer_running=trainer_there,
        )

    def _execute(self, decided: Plan) -> None:
        state = self.state
        for action in decided.actions:
            if isinstance(action, ForgetPart):
                state = replace(
                    state,
                    parts=without(state.parts, action.step),
                    missing=without(state.missing, action.step),
                )
            elif isinstance(action, Abandon):
                log.warning("Giving up on step %d: %s", action.step, action.why)
                state = replace(
                    state,
                    parts=without(state.parts, action.step),
                    missing=without(state.missing, action.step),
                    abandoned=state.abandoned | {action.step},
                )
        # forget what is gone from the local tier
        local_steps = {r for r in decided.verdicts if "local" in decided.verdicts[r].tiers}
        state = replace(state, abandoned=state.abandoned & local_steps)
        self.state = state
        self._submit_work(decided)
        self._prune([d for d in decided.deletes if d.tier == "local"])
        durable_deletes = [d for d in decided.deletes if d.tier == "durable"]
        if durable_deletes and not self.durable_lane.busy:
            self.durable_lane.submit(self._delete_job(durable_deletes))

    def _submit_work(self, decided: Plan) -> None:
        fingerprint = next(iter(decided.of(Fingerprint)), None)
        if fingerprint is not None and not self.local_lane.busy:
            self.local_lane.submit(self._fingerprint_job(fingerprint.step))
        transfer = next(iter(a for a in decided.actions if isinstance(a, Upload | Displace)), None)
        restoring = self.mtc is not None and self.mtc.pending_restore is not None
        if transfer is not None and not self.transfer.busy and not restoring:
            more = len(decided.uploads) - 1
            if isinstance(transfer, Upload):
                log.info(
                    "Promoting step %d (%s)%s",
                    transfer.step,
                    transfer.reason,
                    f", {more} more due" if more > 0 else "",
                )
                self.transfer.submit(self._upload_job(transfer))
            else:
                log.warning("Moving durable step %d aside: %s", transfer.step, transfer.why)
                self.transfer.submit(self._displace_job(transfer))
        commits = decided.of(Commit)
        if commits and not self.durable_lane.busy:
            self.durable_lane.submit(self._commit_job(commits))

    def _watch_trainer(self) -> None:
        """Is a trainer there? A ``tiered.CheckpointManager`` holds its lock; orbax's multi-tier
        client takes none, but its JAX coordinator (named in ``jax-init-info.txt``) accepts
        connections for as long as the job runs. Once either was seen, its going away means the
        run ended, and the newest local step is owed to the durable tier."""
        now = time.monotonic()
        if now - self._probed_at < 2.0:
            return
        self._probed_at = now
        up = self.mtc.coordinator_up() if self.mtc is not None else None
        held = self.trainer_lock.holder() is not None
        state = self.state
        seen = state.trainer_seen or held or bool(up)
        if up is not None and up != state.coordinator_up:
            log.info(
                "The trainer's JAX coordinator is %s", "up" if up else "gone: the run has ended"
            )
        self.state = replace(state, trainer_seen=seen, coordinator_up=bool(up))

    def _prune(self, deletes: list[Delete]) -> None:
        busy = {job.step for job in (self.transfer.job, self.local_lane.job) if job}
        deletes = [d for d in deletes if d.step not in busy]
        if not deletes:
            return
        try:
            done = apply_deletes(deletes, self.local, self.durable)
        except (StorageError, OSError) as err:
            self.state = self.state.error("prune", str(err), time.time())
            log.warning("Pruning stopped: %s", err)
            return
        for d in done:
            self.metrics.pruned.labels(tier=d.tier).inc()
            self.state = self.state.pruned_now(d.tier, d.step, time.time())

    def _maybe_list_durable(self) -> None:
        """List the durable tier every ``rescan_seconds`` (and after our own writes); while it
        does not answer, retry with capped exponential backoff, for as long as it takes."""
        state = self.state
        tiered = self.cfg.tiered
        if state.list_failures:
            every = min(
                tiered.retry_max_seconds,
                tiered.retry_initial_seconds * 2 ** (state.list_failures - 1),
            )
            requested = False  # our own writes cannot have happened: wait for the backoff
        else:
            every, requested = tiered.rescan_seconds, state.scan_requested
        due = time.monotonic() - state.listed_at >= every
        if (due or requested or state.listed_at == 0.0) and not self.durable_lane.busy:
            self.state = replace(state, scan_requested=False)
            self.durable_lane.submit(self._list_job())

    def _check_disk(self) -> None:
        floor = self.cfg.tiered.min_free_local_fraction
        try:
            free = self.local.free_fraction(self.cfg.tiered.local_capacity)
        except OSError:
            return
        pressure = free < floor
        if pressure != self.state.disk_pressure:
            if pressure:
                log.warning(
                    "Local disk pressure: %.1f%% free, below the %.1f%% floor; keeping only the "
                    "newest and pinned local steps",
                    free * 100,
                    floor * 100,
                )
            else:
                log.info("Local disk pressure over: %.1f%% free", free * 100)
            self.state = replace(self.state, disk_pressure=pressure)
        self.metrics.disk_pressure.set(1 if pressure else 0)

    # -- jobs (run on a lane's thread; they return values and never touch self.state) --------

    def _upload_job(self, upload: Upload) -> Job:
        durable, local, tiered = self.durable, self.local, self.cfg.tiered

        def run(progress: Progress) -> TransferResult:
            for attempt in range(1, tiered.retry_attempts + 1):
                progress.attempt = attempt
                try:
                    return promote_step(
                        local, durable, upload.step, progress=progress, reason=upload.reason
                    )
                except StorageError as err:
                    if not err.transient or attempt == tiered.retry_attempts:
                        raise
                    delay = random.uniform(
                        0, min(tiered.retry_max_seconds, tiered.retry_initial_seconds * 2**attempt)
                    )
                    log.warning(
                        "Promotion of step %d failed (attempt %d/%d), retrying in %.1f s: %s",
                        upload.step,
                        attempt,
                        tiered.retry_attempts,
                        delay,
                        err,
                    )
                    time.sleep(delay)
            raise AssertionError("unreachable")

        return Job("upload", upload.step, run, data=upload)

    def _displace_job(self, displace: Displace) -> Job:
        durable = self.durable
        return Job(
            "displace",
            displace.step,
            lambda _p: durable.displace_step(displace.step, now=time.time()),
            data=displace,
        )

    def _fingerprint_job(self, step: int) -> Job:
        local = self.local
        return Job("fingerprint", step, lambda _p: local.manifest(step))

    def _commit_job(self, commits: list[Commit]) -> Job:
        """Try every waiting commit in one job, so no step waits behind another."""
        local, durable = self.local, self.durable

        def run(_p: Progress) -> list[tuple[Commit, list[int] | BaseException, Manifest | None]]:
            out: list[tuple[Commit, list[int] | BaseException, Manifest | None]] = []
            for c in commits:
                try:
                    missing = commit_parts(local, durable, c.step, epoch=c.epoch)
                except (TieredError, OSError) as err:
                    out.append((c, err, None))
                    continue
                out.append((c, missing, None if missing else local.cached_manifest(c.step)))
            return out

        return Job("commit", None, run, data=commits)

    def _delete_job(self, deletes: list[Delete]) -> Job:
        local, durable = self.local, self.durable

        def run(_p: Progress) -> list[Delete]:
            done: list[Delete] = []
            try:
                for d in deletes:
                    done += apply_deletes([d], local, durable)
            except (StorageError, OSError) as err:
                raise _PartlyDone(done, err) from err
            return done

        return Job("delete", None, run, data=deletes)

    def _list_job(self) -> Job:
        durable, multi = self.durable, self.topology.multi
        version = self.state.durable_version
        timeout = self.cfg.tiered.durable_timeout_seconds

        def listing() -> tuple[list[DurableStep], int, list]:
            durable.check()  # a missing bucket says so, instead of listing as empty
            steps = durable.scan()
            epoch = Rendezvous(durable).current_epoch() if multi else 0
            return steps, epoch, durable.list_displaced()

        def run(_p: Progress) -> tuple[list[DurableStep], int, list]:
            # Storage clients retry on their own for a minute or more (gcsfs: six tries);
            # readiness should not wait that long to say the store is away.
            return within(timeout, listing)

        return Job("list", None, run, data=version)

    def _stage_job(self, step: int) -> Job:
        local, durable = self.local, self.durable
        return Job("stage", step, lambda _p: stage_step(local, durable, step))

    def _agree_job(self) -> Job:
        local, durable, timeout = self.local, self.durable, self.cfg.tiered
        return Job(
            "agree",
            None,
            lambda _p: agree(
                local,
                durable,
                timeout=timeout.restore_agreement_timeout_seconds,
                should_stop=self.stopping.is_set,
            ),
        )

    # -- outcomes (applied by the loop thread) --------------------------------------------------

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
                state = state.durable_with(_durable_fact(step, manifest))
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
        self.state = state.durable_with(_durable_fact(commit.step, manifest))

    def _on_delete(self, outcome: Outcome) -> None:
        err = outcome.error
        done: list[Delete] = outcome.value or []
        if isinstance(err, _PartlyDone):
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
        set_aside_newer(self.local, decision.step, why="the nodes agreed on an older step")
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
        if mtc.pending_restore is None or self.transfer.job is not None:
            return  # nothing asked; or an upload, a staging or an agreement is running
        if self.restore_choice is None:
            if self.topology.multi:
                self.transfer.submit(self._agree_job())
                return
            if self.state.durable is None and time.monotonic() - self._started_mono < 60:
                return  # give the first durable listing a chance: it may hold a newer step
            local = self.local.scan()
            options = restore_options(local, self.state.durable or ())
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
            self.transfer.submit(self._stage_job(choice.step))

    # -- run ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Lock, check the durable tier, start the watcher and the HTTP server."""
        from daemon.watcher import Watcher

        os.umask(0o022)
        self.local.ensure()
        self.lock.acquire()
        self.local.empty_trash()
        # The durable tier is not checked here: the daemon starts, serves its probes and keeps
        # the local tier safe however long the store is away (the first listing says why).
        self.watcher = Watcher(self.local.root, self.wake)
        self.watcher.start()
        self.server = StatusServer(
            self.cfg.tiered.status_address,
            {
                "/status": lambda: (200, "application/json", self.status_json().encode()),
                "/metrics": lambda: (200, "text/plain; version=0.0.4", self.metrics.render()),
                "/healthz": self._healthz,
                "/readyz": self._readyz,
            },
        )
        self.server.start()
        self.lock.annotate(self.server.address)
        if self.mtc is not None:
            self.mtc.ensure_jax_init_info()
        log.info(
            "tiered daemon %d serving %s -> %s (durable every %d steps), status on http://%s",
            os.getpid(),
            self.local.root,
            self.durable.url,
            self.cfg.durable_period,
            self.server.address,
        )

    def _healthz(self) -> tuple[int, str, bytes]:
        alive, why = self.alive()
        return (200 if alive else 503), "text/plain", f"{why}\n".encode()

    def _readyz(self) -> tuple[int, str, bytes]:
        ready, why = self.health()
        return (200 if ready else 503), "text/plain", f"{why}\n".encode()

    def run(self) -> int:
        self.start()
        try:
            self.cycle(force_rescan=True)
            tick = self._tick
            while not self.stopping.is_set():
                # Node 0 polls for the other nodes' parts every second while a commit waits.
                waiting = self.state.parts and self.topology.committer
                self.wake.wait(1.0 if waiting else tick)
                self.wake.clear()
                if self.stopping.is_set():
                    break
                try:
                    self.cycle()
                except AlreadyRunning:
                    raise
                except (TieredError, OSError) as err:
                    self.state = self.state.error("cycle", str(err), time.time())
                    log.warning("Cycle failed, retrying: %s", err)
            return self.drain()
        finally:
            self.close()

    def drain(self) -> int:
        """Keep cycling until nothing is owed (preemption and final steps first, and the newest
        local step when the trainer is gone), within the grace period."""
        grace = self.cfg.tiered.shutdown_grace_seconds
        deadline = time.monotonic() + grace
        settle_until = time.monotonic() + min(3.0, grace / 10)
        self.draining = True
        log.info("Draining (up to %.0f s): promoting what is still owed to the durable tier", grace)
        decided = self.view.decided if self.view else None
        while time.monotonic() < deadline:
            try:
                decided = self.cycle()
            except AlreadyRunning:
                raise
            except (TieredError, OSError) as err:
                log.warning("Cycle failed while draining: %s", err)
            busy = self.transfer.busy or self.local_lane.busy
            owed = decided.owed if decided is not None else frozenset()
            settled = not busy and not owed and time.monotonic() >= settle_until
            if settled and not self._save_in_progress():
                log.info("Drained: nothing left to promote; exiting")
                return 0
            self.wake.wait(0.2)
            self.wake.clear()
        job = self.transfer.job
        progress = self.transfer.progress
        left = sorted(decided.owed) if decided is not None else []
        log.error(
            "Shutdown grace of %.0f s ran out. Left undone: %s%s",
            grace,
            f"{job.kind} of step {job.step} ({progress.bytes_done}/{progress.bytes_total} bytes); "
            if job
            else "",
            f"steps owed to the durable tier: {left}" if left else "no other steps",
        )
        return 1

    def _save_in_progress(self, *, quiet_seconds: float = 5.0) -> bool:
        """Whether the trainer is writing a save now: a tmp directory written to recently.

        A tmp directory left by a trainer killed mid-save stays forever; it must not hold the
        drain until the grace period runs out.
        """
        try:
            tmps = [p for p in self.local.root.iterdir() if is_tmp_name(p.name)]
        except OSError:
            return False
        cutoff = time.time() - quiet_seconds
        for tmp in tmps:
            for dirpath, _dirs, files in os.walk(tmp):
                for name in [".", *files]:
                    with contextlib.suppress(OSError):
                        if os.stat(os.path.join(dirpath, name)).st_mtime > cutoff:
                            return True
        return False

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.server is not None:
            self.server.stop()
        self.lock.release()


def _durable_fact(step: int, manifest: Manifest | None) -> DurableStep:
    """What the durable tier holds right after this daemon committed ``step`` from ``manifest``
    (the next listing says the same; until then the planner must not plan the step again)."""
    if manifest is None:  # the kept manifest went away meanwhile: the listing will tell
        return DurableStep(step=step, committed=True, problem="not listed yet")
    return DurableStep(
        step=step,
        committed=True,
        identity=manifest.identity,
        reason=as_reason(manifest.reason),
        commit_time=manifest.commit_time,
        size=manifest.total_bytes,
    )


class _PartlyDone(Exception):
    """A batch of deletions stopped part way: what was done, and why it stopped."""

    def __init__(self, done: list[Delete], error: BaseException) -> None:
        super().__init__(str(error))
        self.done = done
        self.error = error


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


_LIBRARIES = (
    "urllib3",
    "botocore",
    "aiobotocore",
    "gcsfs",
    "fsspec",
    "watchdog",
    "google",
    "asyncio",
    "s3fs",
    "aiohttp",
)


class _OneLineFromLibraries(logging.Filter):
    """Storage clients log their own retries and failures, with tracebacks (gcsfs: "out of
    retries on exception", 40 lines). tiered reports the same failure itself, in one line, so a
    library's record keeps its first line and loses its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in _LIBRARIES:
            record.msg = record.getMessage().splitlines()[0] if record.getMessage() else ""
            record.args = ()
            record.exc_info = record.exc_text = record.stack_info = None
        return True


def configure_logging(fmt: str, *, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_OneLineFromLibraries())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in _LIBRARIES:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def lower_cpu_priority(nice: int) -> int:
    """Run at least at ``nice`` (``tiered.daemon_nice``), so that on a busy host the trainer's
    threads win the CPU and the daemon takes what is left. Returns the nice value now in force.

    Called before the daemon starts any thread: on Linux the nice value is per thread and new
    threads inherit it. It only ever lowers the priority, which needs no privilege; a daemon
    started at a higher nice value keeps it.
    """
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice > current:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError as err:  # e.g. a seccomp profile that forbids it: run anyway, and say so
            log.warning("Could not lower the daemon's CPU priority to nice %d: %s", nice, err)
            return current
        return nice
    return current


def run_daemon(cfg: TieredConfig, *, log_format: str = "text") -> int:
    """The ``tiered daemon`` entry point: run until SIGTERM/SIGINT, then drain."""
    configure_logging(log_format)
    nice = lower_cpu_priority(cfg.tiered.daemon_nice)
    log.info("Running at nice %d (tiered.daemon_nice: %d)", nice, cfg.tiered.daemon_nice)
    # `kill -USR1 <pid>` prints every thread's stack: stuck work is visible without a debugger.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        daemon = Daemon(cfg)

        def on_signal(signum: int, frame: object) -> None:
            log.info("Received %s", signal.Signals(signum).name)
            daemon.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        return daemon.run()
    except TieredError as err:
        print(f"tiered: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # what start-up meets on a path a user gave: say which, in a line
        where = f": {err.filename}" if err.filename else ""
        print(f"tiered: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2

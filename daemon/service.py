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

import logging
import os
import queue
import threading
import time
from dataclasses import replace
from typing import Any

from daemon import jobs
from daemon.board import Board
from daemon.disk import LocalSpace
from daemon.http import StatusServer
from daemon.metrics import Metrics
from daemon.mtc import MtcProtocol
from daemon.outcomes import Outcomes
from daemon.peers import Peering
from daemon.restore import RestoreFlow
from daemon.settings import Settings
from daemon.state import DaemonState, without
from daemon.trainer import TrainerWatch
from daemon.views import View, Views
from daemon.workers import Lane, Outcome
from tiered import AlreadyRunning, LocalTier, StorageError, TieredConfig, TieredError
from tiered.sidecar import (
    Abandon,
    Commit,
    Delete,
    DirectoryLock,
    Displace,
    Fingerprint,
    ForgetPart,
    FullSpeed,
    Plan,
    Snapshot,
    Upload,
    apply_deletes,
    plan,
    risk_now,
)

log = logging.getLogger("daemon")


class Daemon:
    """The loop thread and the parts it is made of, wired here (docs/design.md draws it).

    The loop alone replaces ``state``; each part is handed what it needs: the ``settings`` in
    force, a tier, a lane, the metrics. The parts' reducers take a state and return the next.
    """

    def __init__(self, cfg: TieredConfig) -> None:
        self.settings = settings = Settings(cfg)
        self.local = local = LocalTier(cfg.local_dir)
        self.metrics = metrics = Metrics()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        # Four lanes, a thread each: a job's outcome goes to the outbox, and wakes the loop.
        self.outbox: queue.Queue[Outcome] = queue.Queue()
        self.transfer = Lane("transfer", self.outbox, self.wake)
        self.durable_lane = Lane("durable", self.outbox, self.wake)
        self.local_lane = Lane("local", self.outbox, self.wake)
        self.peer_lane = Lane("peer", self.outbox, self.wake)
        self.lock = DirectoryLock(local.tiered_dir)
        self.mtc = MtcProtocol.for_config(cfg, local.root)
        self.trainer = TrainerWatch(local.tiered_dir, self.mtc)
        self.space = LocalSpace(settings, local)
        self.peering = Peering(
            settings,
            local,
            lane=self.peer_lane,
            metrics=metrics,
            mtc=self.mtc,
            room=self.space.room,
        )
        self.restore = (
            RestoreFlow(
                self.mtc,
                settings,
                local,
                transfer=self.transfer,
                local_lane=self.local_lane,
                stopping=self.stopping,
                on_accept=self.trainer.probe_now,
            )
            if self.mtc is not None
            else None
        )
        outcomes = Outcomes(settings, local, metrics)
        # Each job kind's outcome, and the part that reduces it (the loop applies them all).
        self._handlers = {**outcomes.handlers(), "replicate": self.peering.on_replicate}
        if self.restore is not None:
            self._handlers.update(stage=self.restore.on_stage, agree=self.restore.on_agree)
        # The loop's own figures: only this thread writes them; others read through the views.
        self.state = DaemonState()
        self.view: View | None = None
        self.draining = False
        self.heartbeat = time.monotonic()
        self.local_free: int | None = None
        """Free bytes on the local tier, as this cycle measured them."""
        self._commit_tried_at = 0.0
        self._tick = min(cfg.tiered.rescan_seconds, cfg.tiered.prune_interval_seconds, 5.0)
        self.views = Views(
            settings,
            local,
            metrics=metrics,
            transfer=self.transfer,
            trainer=self.trainer,
            peering=self.peering,
            free=self.space.free,
            mtc=self.mtc,
            state=lambda: self.state,
            snapshot=self.snapshot,
            last=lambda: self.view,
            heartbeat=lambda: self.heartbeat,
            tick=self._tick,
        )
        self.server: StatusServer | None = None
        self.watcher: Any = None
        self.board = Board(cfg) if cfg.tiered.tensorboard_dir else None

    # -- the cycle -----------------------------------------------------------------------------

    def cycle(self, *, force_rescan: bool = False) -> Plan:
        self.heartbeat = time.monotonic()
        self._check_lock()
        self._apply_outcomes()
        if force_rescan:
            self.state = replace(self.state, scan_requested=True)
        if self.restore is not None:
            self.state = self.restore.cycle(self.state)
        self._maybe_list_durable()
        self._check_disk()
        self.state = self.trainer.probe(self.state)
        snap = self.snapshot(self.state)
        decided = plan(snap, self.settings.rules)
        self._execute(decided)
        self.peering.submit(self.state)
        self.view = View(snap, decided)
        self._record_metrics(snap, decided)
        if self.board is not None:
            self.board.update(snap, self.views.status)
        return decided

    def _record_metrics(self, snap: Snapshot, decided: Plan) -> None:
        m, cfg = self.metrics, self.settings.cfg
        m.record_tiers(snap, local_free=self.local_free)
        healthy, why = self.views.health()
        risk, _notes = risk_now(  # the same figures as `tiered status`
            snap.local,
            snap.durable,
            now=snap.now,
            saves_on_signal=cfg.saves_on_sigterm,
            cannot_promote=None if healthy else f"the daemon cannot promote it now: {why}",
            local_period=cfg.local_checkpoint_period,
            trainer_running=self.trainer.running(),
            replicated=self.peering.replicated_step(self.state),
        )
        m.record_risk(risk)
        job = self.transfer.job
        running = job is not None and job.kind == "upload"
        m.current_upload_seconds.set(time.time() - job.started if running and job else 0)
        m.ready.set(1 if healthy else 0)
        held = self.peering.held_bytes()
        if held is not None:
            m.peer_held_bytes.set(held)
        m.record_plan(decided, failed=len(self.state.failed))

    def _apply_outcomes(self) -> None:
        while True:
            try:
                outcome = self.outbox.get_nowait()
            except queue.Empty:
                return
            self.state = self._handlers[outcome.job.kind](self.state, outcome)

    def _check_lock(self) -> None:
        if self.lock.still_held():
            return
        log.warning("The lock file %s was removed or replaced; taking it again", self.lock.path)
        self.local.ensure()
        self.lock.reacquire()  # AlreadyRunning when another daemon took it meanwhile: exit

    def snapshot(self, state: DaemonState) -> Snapshot:
        """Both tiers as the daemon sees them now (reads only: any thread may call it)."""
        # The run is over when a trainer this daemon saw holding its lock is gone (the kernel
        # frees the lock even after kill -9), or when the daemon drains with no trainer there
        # (a client that takes no lock, such as orbax's, only ever ends that way).
        trainer_there = self.trainer.there(state)
        ended = not trainer_there and (state.trainer_seen or self.draining)
        busy = self._busy_steps()
        staged = self.restore.staged() if self.restore is not None else frozenset()
        return Snapshot(
            now=time.time(),
            local=tuple(self.local.scan(with_size=True)),
            durable=state.durable,
            busy=busy,
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
            draining=self.draining,
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
            self.durable_lane.submit(
                jobs.delete(self.local, self.settings.durable, durable_deletes)
            )

    def _submit_work(self, decided: Plan) -> None:
        hurry = next(iter(decided.of(FullSpeed)), None)
        for job in (self.transfer.job, self.peer_lane.job):
            if hurry is not None and job is not None and job.pacer and not job.pacer.lifted:
                log.info("Step %d now goes at full speed: %s", job.step, hurry.why)
                job.pacer.lift()
        fingerprint = next(iter(decided.of(Fingerprint)), None)
        if fingerprint is not None and not self.local_lane.busy:
            self.local_lane.submit(jobs.fingerprint(self.local, fingerprint.step))
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
                setup = self.settings.now
                self.transfer.submit(jobs.upload(setup.cfg, self.local, setup.durable, transfer))
            else:
                log.warning("Moving durable step %d aside: %s", transfer.step, transfer.why)
                self.transfer.submit(jobs.displace(self.settings.durable, transfer))
        commits = decided.of(Commit)
        # Once a second: each try lists the step's parts, and the job's end wakes the loop,
        # which would otherwise try again at once, a listing after another, while a node is away.
        now = time.monotonic()
        if commits and not self.durable_lane.busy and now - self._commit_tried_at >= 1.0:
            self._commit_tried_at = now
            self.durable_lane.submit(jobs.commit(self.local, self.settings.durable, commits))

    def _busy_steps(self) -> frozenset[int]:
        """The steps a lane's job works on now (step 0 included): never deleted under it."""
        lanes = (self.transfer.job, self.local_lane.job, self.peer_lane.job)
        return frozenset(job.step for job in lanes if job is not None and job.step is not None)

    def _prune(self, deletes: list[Delete]) -> None:
        busy = self._busy_steps()  # a job may have started since the plan's snapshot
        deletes = [d for d in deletes if d.step not in busy]
        if not deletes:
            return
        try:
            done = apply_deletes(deletes, self.local, self.settings.durable)
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
        tiered = self.settings.cfg.tiered
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
            self.durable_lane.submit(
                jobs.listing(
                    self.settings.durable,
                    version=self.state.durable_version,
                    timeout=tiered.durable_timeout_seconds,
                )
            )

    def _check_disk(self) -> None:
        # once per cycle: with a capacity set, it walks the local directory
        self.local_free, self.state = self.space.check(self.state)
        if self.local_free is None:
            return
        if self.state.disk_pressure:
            self.peering.shed()
        self.metrics.disk_pressure.set(1 if self.state.disk_pressure else 0)

    # -- run ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Lock, check the durable tier, start the watcher and the HTTP server."""
        from daemon.watcher import Watcher

        os.umask(0o022)
        self.local.ensure()
        self.lock.acquire()
        self.local.clear_leftovers()
        # The durable tier is not checked here: the daemon starts, serves its probes and keeps
        # the local tier safe however long the store is away (the first listing says why).
        self.watcher = Watcher(self.local.root, self.wake)
        self.watcher.start()
        self.server = StatusServer(self.settings.cfg.tiered.status_address, self.views.routes())
        self.server.start()
        self.lock.annotate(self.server.address)
        self.peering.start()
        if self.mtc is not None:
            self.mtc.ensure_jax_init_info()
        log.info(
            "tiered daemon %d serving %s -> %s (durable every %d steps), status on http://%s",
            os.getpid(),
            self.local.root,
            self.settings.durable.url,
            self.settings.cfg.durable_period,
            self.server.address,
        )

    def run(self) -> int:
        self.start()
        try:
            self.cycle(force_rescan=True)
            tick = self._tick
            while not self.stopping.is_set():
                # Node 0 polls for the other nodes' parts every second while a commit waits.
                waiting = self.state.parts and self.settings.topology.committer
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
        from daemon.watcher import save_in_progress

        grace = self.settings.cfg.tiered.shutdown_grace_seconds
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
            if settled and not save_in_progress(self.local.root):
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

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.server is not None:
            self.server.stop()
        self.peering.stop()
        if self.board is not None:
            self.board.close()
        self.lock.release()
